// dev.sparrow: the Kotlin API over libsparrow_ffi.so (the JNI entry points of ffi/src/jni.rs).
// Build the .so first (see README.md): it is picked up from src/main/jniLibs/<abi>/.
plugins {
    id("com.android.library") version "8.5.2"
    id("org.jetbrains.kotlin.android") version "1.9.24"
}

android {
    namespace = "dev.sparrow"
    compileSdk = 34

    defaultConfig {
        minSdk = 24
        // Keeps the native methods and what the native code calls back into (R8 in apps).
        consumerProguardFiles("consumer-rules.pro")
    }

    sourceSets {
        getByName("main") {
            java.srcDirs("src/main/kotlin")
            jniLibs.srcDirs("src/main/jniLibs")
        }
        // JvmClient.kt is a desktop-JVM program run by ffi/tests/jvm_client.rs, not a unit
        // test Gradle could run without the host build of the library.
    }

    compileOptions {
        sourceCompatibility = JavaVersion.VERSION_17
        targetCompatibility = JavaVersion.VERSION_17
    }

    kotlinOptions {
        jvmTarget = "17"
    }
}
